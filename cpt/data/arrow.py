"""The input formats read with ``datasets`` (Arrow): parquet files, saved datasets, hub datasets.

Rows are read a few at a time from memory-mapped Arrow (a row may be a whole book); a table without the
text column is counted as all rows ``missing_field``, so that the reader's check names its columns.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cpt.data.formats import Format, InputStats
from cpt.errors import CptError


@dataclass(frozen=True)
class HubDataset:
    """A dataset read with ``datasets.load_dataset(name, config, split=split, streaming=streaming)``:
    a hub id (``allenai/c4``) or a local folder of data files. ``streaming`` iterates the rows as they
    arrive instead of downloading (and converting to Arrow) the whole split first; a downloaded set
    is cached (``HF_DATASETS_CACHE``) and read from there offline. Each pass reads it again: a
    validation split reads it twice, a part (``--num-shards``) twice too (the records' sizes first),
    which for a streamed set means streaming it again."""

    name: str
    config: str | None = None
    split: str = "train"
    streaming: bool = False

    def __str__(self) -> str:  # its path in messages and manifests; streamed or not, the same rows
        return f"hf:{self.name}" + (f" config={self.config}" if self.config else "") + f" split={self.split}"


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def dataset_rows(ds, text_field: str, st: InputStats) -> Iterator[object]:
    """Rows of a ``datasets.Dataset`` as ``{text_field: text}``; a Dataset without that column is counted
    as all rows ``missing_field`` (the input's check then names its columns)."""
    if len(ds) == 0:
        return
    if text_field not in ds.column_names:
        st.objects = len(ds)
        st.skipped["missing_field"] = len(ds)
        st.fields_seen.update(ds.column_names)
        return
    column = ds.select_columns([text_field])
    for batch in column.iter(batch_size=100):  # rows may be whole books: few at a time
        for text in batch[text_field]:
            yield {text_field: text}


def _table_rows(fmt: Format, load, path: Path, text_field: str, st: InputStats) -> Iterator[object]:
    """:func:`dataset_rows` of the Dataset ``load()`` gives; one that cannot be loaded is one line."""
    try:
        ds = load()
    except Exception as e:  # corrupt file: report it with its path, one line
        raise CptError(f"input {path} cannot be read as {fmt.name}: {type(e).__name__}: {one_line(e)}") from None
    yield from dataset_rows(ds, text_field, st)


class Parquet(Format):
    """A parquet file: the column named ``text_field``, converted to Arrow in the cache folder."""

    def records(self, path: Path, text_field: str, st: InputStats, cache_dir) -> Iterator[object]:
        import datasets

        cache = str(cache_dir) if cache_dir else None
        yield from _table_rows(self, lambda: datasets.Dataset.from_parquet(str(path), cache_dir=cache), path,
                               text_field, st)


class SavedDataset(Format):
    """A folder written by ``datasets.Dataset.save_to_disk``: its column named ``text_field``."""

    def is_folder_of(self, path: Path) -> bool:
        if (path / "dataset_dict.json").exists():
            splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
            raise CptError(
                f"input {path} is a saved DatasetDict with splits {', '.join(splits)}; "
                f"pass one split folder, e.g. {path / (splits[0] if splits else 'train')}"
            )
        return (path / "state.json").exists() and (path / "dataset_info.json").exists()

    def records(self, path: Path, text_field: str, st: InputStats, cache_dir) -> Iterator[object]:
        import datasets

        yield from _table_rows(self, lambda: datasets.load_from_disk(str(path)), path, text_field, st)


class Hub(Format):
    """A :class:`HubDataset`, downloaded or streamed; the hub unreachable or switched off is one line
    saying what to do."""

    def records(self, spec: HubDataset, text_field: str, st: InputStats, cache_dir=None) -> Iterator[object]:
        """Rows of the set; a stream that breaks off (network) is one CptError line."""
        ds = load_hub_dataset(spec)
        try:
            if not spec.streaming:  # a Dataset, memory-mapped from the cache: read as a saved dataset
                yield from dataset_rows(ds, text_field, st)
                return
            if ds.column_names is not None:  # known before the first row for most sets: fail early
                if text_field not in ds.column_names:
                    raise CptError(f"input {spec}: no field '{text_field}' in any record (fields seen: "
                                   f"{', '.join(sorted(map(str, ds.column_names)))}); set --text-field")
                ds = ds.select_columns([text_field])
            yield from ds  # rows as dicts; rows of sets with unknown columns are checked one by one
        except CptError:
            raise
        except Exception as e:
            raise CptError(f"input {spec}: reading stopped after {st.objects} rows: {type(e).__name__}: "
                           f"{one_line(e)} (run again; without --streaming a download is cached and resumes)") from None


def load_hub_dataset(spec: HubDataset):
    """``datasets.load_dataset`` of ``spec``, or one CptError line saying what to do (hub off or
    unreachable and the set not cached, no such set, config or split)."""
    import datasets

    try:
        return datasets.load_dataset(spec.name, spec.config, split=spec.split, streaming=spec.streaming)
    except Exception as e:
        raise _hub_error(spec, e) from None


def _hub_error(spec: HubDataset, e: Exception) -> CptError:
    import datasets

    why = one_line(e)
    unreachable = isinstance(e, (ConnectionError, TimeoutError)) or "Connect" in type(e).__name__
    if datasets.config.HF_HUB_OFFLINE and (unreachable or isinstance(e, FileNotFoundError)):
        switches = [f"{v}={os.environ[v]}" for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(v)]
        return CptError(
            f"input {spec}: not in the local datasets cache, and the hub is switched off "
            f"({', '.join(switches) or 'offline mode'}): run once with HF_HUB_OFFLINE=0 where the hub is "
            "reachable (without --streaming the download is cached and then read offline), or pass local files")
    if unreachable:
        return CptError(
            f"input {spec}: cannot reach the Hugging Face Hub ({why}): check the network (or HF_ENDPOINT, a "
            "proxy); or download it once where the hub is reachable (without --streaming it is cached, and "
            "HF_HUB_OFFLINE=1 reads the cache), or pass local files")
    if isinstance(e, datasets.exceptions.DatasetNotFoundError):
        return CptError(f"input {spec}: {why} (a gated or private set needs `hf auth login` first)")
    if isinstance(e, ValueError):  # an unknown config or split: datasets' message lists the ones there are
        return CptError(f"input {spec}: {why}")
    return CptError(f"input {spec} cannot be loaded: {type(e).__name__}: {why}")
