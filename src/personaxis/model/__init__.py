"""Loading models, finding their decoder blocks, and rendering chats with per-token labels."""

from personaxis.model.blocks import find_blocks
from personaxis.model.chat import Label, RenderedChat, render_chat
from personaxis.model.loading import ChatModel, load_model

__all__ = ["ChatModel", "Label", "RenderedChat", "find_blocks", "load_model", "render_chat"]
