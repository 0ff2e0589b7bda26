"""What a team needs to run channel-canary: rules, routing, dashboards, manifests (and the sandbox's own files)."""
