"""The floor that runs the engine on a model: generation with one-pass capture, capture of finished chats, the
means and differences that make directions, and the path from an artifact to an op (steering, capping, monitoring)."""
