"""The dump format: records (schema), an atomic writer, a validating reader.

docs/dump-format.md is the spec. Nothing here unpickles: tensors live in
safetensors shards, everything else is JSON.
"""

from parity.store.reader import Dump, open_dump
from parity.store.schema import FORMAT_VERSION, Record
from parity.store.writer import DumpWriter, prepare_run_dir

__all__ = ["Dump", "open_dump", "Record", "FORMAT_VERSION", "DumpWriter", "prepare_run_dir"]
