"""Data: image files, chat records, tokenisation, batching, and dataset readers."""

from medcap.data.dataset import ImageChatDataset, chat_dataset

__all__ = ["ImageChatDataset", "chat_dataset"]
