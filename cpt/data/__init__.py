"""Data: train a tokenizer, prepare token shards once, read them, mix sources reproducibly.

Import from the modules (``from cpt.data.prepare import prepare``); nothing is re-exported here,
so that the function ``prepare`` never shadows the module ``cpt.data.prepare``.

  reader     raw files -> documents, bad records counted by reason
  tokenizer  train_tokenizer, load_tokenizer, tokenizer_hash
  prepare    prepare: documents -> packed, memory-mapped token shards + manifest.json
  source     TokenSource: open a prepared folder, read sequences by index
  mixture    MixtureSampler (state = a few ints), read_batch
"""
