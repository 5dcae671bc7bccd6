"""Deterministic synthetic support tickets for the quick start (all text is generated here).

A ticket's label combines two independent factors, its topic and its urgency, so no single
keyword decides the label: a model has to pick up both the topic phrase and the urgency phrase.
"""

from __future__ import annotations

import random

from fedpeft.data.records import ClassificationData, PromptResponseData
from fedpeft.errors import DataError

TOPICS: tuple[str, ...] = ("billing", "access", "appointments")
URGENCY_LEVELS: tuple[str, ...] = ("urgent", "routine")
SUPPORT_LABELS: tuple[str, ...] = tuple(f"{t}-{u}" for t in TOPICS for u in URGENCY_LEVELS)

DEPARTMENTS: dict[str, str] = {
    "billing": "billing",
    "access": "account access",
    "appointments": "appointments",
}

# Shared words ("account", "payment", "appointment", "urgent") appear under several labels on purpose.
TOPIC_PHRASES: dict[str, tuple[str, ...]] = {
    "billing": (
        "I was charged twice for the same {service} on my last statement",
        "my invoice {ref} shows {amount} that I don't recognise",
        "the automatic payment of {amount} did not go through",
        "I need a refund for the {amount} that was taken from my card",
        "there is a late fee on my bill that shouldn't be there",
        "the balance on my statement does not match what I paid",
        "I want to set up a payment plan for the outstanding {amount}",
        "my direct debit was collected twice this month",
        "I need an itemised receipt for the {amount} I paid on {date}",
        "the {service} was billed to my account at the wrong price",
    ),
    "access": (
        "I can't log in to my online account",
        "the password reset email never arrives",
        "the app keeps saying my username is not recognised",
        "my account got locked after too many sign-in attempts",
        "the verification code is sent to my old phone number",
        "I'm unable to sign in to the online portal since the update",
        "the website rejects my new password every time",
        "I was logged out and now my security questions don't work",
        "I need to change the email address I use to log in",
        "the login page says my credentials are invalid",
    ),
    "appointments": (
        "I need to reschedule my appointment on {date}",
        "I'd like to book a consultation with {staff}",
        "my appointment with {staff} was cancelled without notice",
        "I'd like to move my visit to a later time slot",
        "I want to cancel the meeting booked for {date}",
        "your office has no record of the slot I booked for {date}",
        "I'd like to schedule a follow-up visit with {staff}",
        "the reminder shows the wrong time for my appointment",
        "I need to book an in-person meeting at the {branch} branch",
        "the calendar only offers slots that clash with my work",
    ),
}

URGENCY_PHRASES: dict[str, tuple[str, ...]] = {
    "urgent": (
        "this is urgent",
        "please help as soon as possible",
        "I need this fixed today",
        "I have to sort this out before the deadline tomorrow",
        "this really can't wait",
        "it has to be resolved within the hour",
        "please treat this as an emergency",
        "my flight leaves at {time} tonight and I need this settled first",
        "I need an answer right away",
        "it's urgent, I'm stuck until this is resolved",
    ),
    "routine": (
        "no rush, whenever you get a chance",
        "this is not urgent",
        "there's no hurry on this",
        "any time in the next few weeks is fine",
        "it can wait until after the holidays",
        "just flagging it for when you have a spare moment",
        "feel free to get back to me next month",
        "it's a minor thing, so take your time",
        "please look into it at your convenience",
        "it's not pressing at all",
    ),
}

# Neutral clauses used with every label; two mention other topics' nouns as mild distractors.
FILLERS: tuple[str, ...] = (
    "", "", "",
    "My name is {name}.",
    "I have been a customer for {years} years.",
    "My reference number is {ref}.",
    "I tried calling but the line was busy.",
    "I'm writing on behalf of my {relative}.",
    "Thanks for your help last time.",
    "I already checked the help pages.",
    "I'm writing from the {branch} area.",
    "My account number ends in {digits}.",
    "I keep my appointment letters and payment receipts in one folder, if that helps.",
)
GREETINGS: tuple[str, ...] = ("", "", "Hi,", "Hello,", "Good morning,", "Dear support team,", "Hey there,")
CLOSINGS: tuple[str, ...] = ("", "", "Thanks, {name}.", "Kind regards, {name}", "Thank you.", "Best, {name}")
TEMPLATES: tuple[str, ...] = (
    "{greeting} {Topic}. {Urgency}. {filler} {closing}",
    "{greeting} {Urgency}. {Topic}. {filler} {closing}",
    "{greeting} {filler} {Topic}. {Urgency}. {closing}",
    "{greeting} {Topic} - {urgency}. {closing}",
    "{Urgency}: {topic}. {filler} {closing}",
    "Regarding reference {ref}: {topic}. {Urgency}. {closing}",
    "{greeting} {filler} {Urgency}; {topic}. {closing}",
    "{greeting} Quick note: {topic}. {filler} {Urgency}.",
)

FIRST_NAMES: tuple[str, ...] = (
    "Amara", "Ben", "Chloe", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas",
    "Kofi", "Lena", "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq",
)
SURNAMES: tuple[str, ...] = (
    "Adler", "Bose", "Castro", "Dunn", "Eze", "Fischer", "Gupta", "Holm", "Ito", "Kowalski",
)
MONTHS: tuple[str, ...] = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)
SERVICES: tuple[str, ...] = ("blood test", "card fee", "consultation", "x-ray", "transfer fee", "check-up")
BRANCHES: tuple[str, ...] = ("north", "south", "east", "west", "central", "riverside")
RELATIVES: tuple[str, ...] = ("mother", "father", "partner", "son", "daughter", "grandmother")


def make_support_tickets(num_examples: int, seed: int = 0) -> ClassificationData:
    """Generate `num_examples` tickets with labels from SUPPORT_LABELS, balanced to within one."""
    rng = _rng(num_examples, seed)
    labels = [i % len(SUPPORT_LABELS) for i in range(num_examples)]
    rng.shuffle(labels)
    texts = []
    for label in labels:
        topic, urgency = SUPPORT_LABELS[label].split("-")
        texts.append(_ticket(rng, topic, urgency))
    return ClassificationData(texts=tuple(texts), labels=tuple(labels), label_names=SUPPORT_LABELS)


MULTITASK_LABELS: tuple[str, ...] = (*(f"topic:{t}" for t in TOPICS), *(f"urgency:{u}" for u in URGENCY_LEVELS))


def make_multitask_tickets(num_examples: int, seed: int = 0) -> ClassificationData:
    """Tickets labelled for one of two tasks, alternately: their topic (3 classes) or their urgency (2 classes);
    label names are ``task:label`` (fedpeft.models.task_heads)."""
    rng = _rng(num_examples, seed)
    texts, labels = [], []
    for i in range(num_examples):
        topic, urgency = rng.choice(TOPICS), rng.choice(URGENCY_LEVELS)
        texts.append(_ticket(rng, topic, urgency))
        name = f"topic:{topic}" if i % 2 == 0 else f"urgency:{urgency}"
        labels.append(MULTITASK_LABELS.index(name))
    return ClassificationData(texts=tuple(texts), labels=tuple(labels), label_names=MULTITASK_LABELS)


def make_prompt_response(num_examples: int, seed: int = 0) -> PromptResponseData:
    """Generate instruction pairs asking for a ticket's urgency, department, or full label."""
    rng = _rng(num_examples, seed)
    prompts, responses = [], []
    for i in range(num_examples):
        topic, urgency = rng.choice(TOPICS), rng.choice(URGENCY_LEVELS)
        ticket = _ticket(rng, topic, urgency)
        task = i % 3
        if task == 0:
            prompts.append(f"Classify the urgency of this support message as urgent or routine: {ticket}")
            responses.append(urgency)
        elif task == 1:
            prompts.append(
                "Which department handles this message (billing, account access or appointments)? "
                f"{ticket}"
            )
            responses.append(DEPARTMENTS[topic])
        else:
            prompts.append(f"Label this support message as <topic>-<urgency>: {ticket}")
            responses.append(f"{topic}-{urgency}")
    return PromptResponseData(prompts=tuple(prompts), responses=tuple(responses))


def _rng(num_examples: int, seed: int) -> random.Random:
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise DataError(
            f"num_examples={num_examples!r} is invalid; set data.num_examples to a positive integer"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"seed={seed!r} is not an integer; set seed to an integer such as 0")
    return random.Random(seed)


def _ticket(rng: random.Random, topic: str, urgency: str) -> str:
    slots = _slots(rng)
    topic_text = rng.choice(TOPIC_PHRASES[topic]).format(**slots)
    urgency_text = rng.choice(URGENCY_PHRASES[urgency]).format(**slots)
    greeting = rng.choice(GREETINGS)
    text = rng.choice(TEMPLATES).format(
        greeting=greeting,
        filler=rng.choice(FILLERS).format(**slots),
        closing=rng.choice(CLOSINGS).format(**slots),
        topic=topic_text,
        Topic=_capitalize(topic_text),
        urgency=urgency_text,
        Urgency=_capitalize(urgency_text),
        ref=slots["ref"],
    )
    text = " ".join(text.split())  # empty optional parts leave runs of spaces behind
    if greeting and text.startswith(greeting + " "):
        rest = text[len(greeting) + 1 :]
        if not rest.startswith(("I ", "I'")):
            text = f"{greeting} {rest[:1].lower()}{rest[1:]}"
    return text


def _slots(rng: random.Random) -> dict[str, str]:
    return {
        "name": rng.choice(FIRST_NAMES),
        "staff": (
            f"Dr. {rng.choice(SURNAMES)}" if rng.random() < 0.5 else f"advisor {rng.choice(FIRST_NAMES)}"
        ),
        "amount": f"{rng.choice('$€£')}{rng.randint(5, 980)}.{rng.randint(0, 99):02d}",
        "date": f"{rng.choice(MONTHS)} {rng.randint(1, 28)}",
        "ref": f"#{rng.randint(10000, 99999)}",
        "digits": f"{rng.randint(0, 9999):04d}",
        "years": str(rng.randint(2, 30)),
        "time": f"{rng.randint(6, 11)}:{rng.choice(('00', '15', '30', '45'))} pm",
        "service": rng.choice(SERVICES),
        "branch": rng.choice(BRANCHES),
        "relative": rng.choice(RELATIVES),
    }


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]
