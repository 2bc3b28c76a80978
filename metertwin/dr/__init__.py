"""The demand-response capability: the twin as its meter's OpenADR 2.0b VEN (decide, remember,
schedule, execute). The VTN-facing VEN processes are the separate ``dr_bridge`` service."""
