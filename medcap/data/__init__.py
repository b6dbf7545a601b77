"""Data: image files, chat records, tokenisation, batching, and dataset readers.

``medcap.data.chat_dataset`` (the config component) is imported lazily so that the converters
in tools/ start without loading torch.
"""

__all__ = ["ImageChatDataset", "chat_dataset"]


def __getattr__(name: str):
    if name in __all__:
        from medcap.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'medcap.data' has no attribute {name!r}")
