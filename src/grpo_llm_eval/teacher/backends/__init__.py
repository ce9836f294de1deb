"""Teacher backends: the OpenAI-compatible client (with its failure handling and transport) and the in-process
llama.cpp teacher (decoded grades, forced-key scores, the child-process probe)."""
