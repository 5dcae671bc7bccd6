"""SecAgg+ (Bell et al., CCS 2020): cryptographic and fixed-point primitives, and the protocol built on them."""
