"""Platform plumbing every capability builds on: settings, errors, auth, the python3-http contract,
long-lived clients, the MQTT session and the meter link's topic tree. Imports no capability."""
