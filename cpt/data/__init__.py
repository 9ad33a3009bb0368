"""Data: train a tokenizer, prepare token shards once, read them, mix sources reproducibly.

Import from the modules (``from cpt.data.prepare import prepare``); nothing is re-exported here,
so that the function ``prepare`` never shadows the module ``cpt.data.prepare``.

  reader     raw files -> documents, bad records counted by reason; FORMATS, the input formats by name
  formats    what a format is (Format) and what the formats share; textfiles, arrow: the formats
  tokenizer  train_tokenizer, load_tokenizer, tokenizer_hash
  prepare    prepare: documents -> packed, memory-mapped token shards + manifest.json
  writer     the shard files and the folder's commit; parts: prepare in parts, merge_parts;
             split: the validation split's rule
  source     TokenSource: open a prepared folder, read sequences by index
  mixture    MixtureSampler (state = a few ints), read_batch
"""
