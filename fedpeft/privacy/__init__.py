"""Per-site differential privacy: accounting over Opacus, the site's privacy ledger, and the site's own policy."""
