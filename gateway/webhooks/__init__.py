"""Third-party webhooks (GW-05): subscriptions, event intake, signed delivery."""
