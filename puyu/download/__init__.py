"""Model downloads (Hugging Face hub and mirrors, ModelScope) and the registry of models we serve.

`resolve_remote_model(name_or_repo)` is what `puyu.resolve` calls for a MODEL that is neither puyu-tiny nor a
directory: a registry name (configs/models/*.yaml) or a hub repository id, downloaded on first use.
"""
from .errors import (DiskFullError, DownloadError, DownloadInterruptedError, HubUnreachableError,
                     MissingPackageError, OfflineError, RepoNotFoundError)
from .hub import DownloadRequest, download
from .registry import ModelEntry, Persona, RegistryError, UnknownModelError, load_registry, lookup
from .remote import is_complete_model, resolve_remote_model

__all__ = ["DiskFullError", "DownloadError", "DownloadInterruptedError", "DownloadRequest", "HubUnreachableError",
           "MissingPackageError", "ModelEntry", "OfflineError", "Persona", "RegistryError", "RepoNotFoundError",
           "UnknownModelError", "download", "is_complete_model", "load_registry", "lookup", "resolve_remote_model"]
