"""The partner token broker: short-lived Entra ID tokens for customer tenants, and their incidents."""
