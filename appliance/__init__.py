"""botwarden appliance: daemon, config, control API, CLI, identity, secrets, policy, protocol fronts."""

__version__ = "0.1.0"
