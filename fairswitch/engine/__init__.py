"""Engine front ends: the step loop (engine.py), its async wrapper and the offline LLM API."""
