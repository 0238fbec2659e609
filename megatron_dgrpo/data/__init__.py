"""Data for long-context post-training: LongBlocks loading, offline tasks, rewards, mixing, packing.

Modules (import what you need; this package imports nothing heavy on its own):

* :mod:`.schema` - public LongBlocks columns and the synthetic metadata columns;
* :mod:`.chat` - chat formatting + tokenization for HF tokenizers and sentencepiece;
* :mod:`.longblocks` - streaming parquet loader with filters, splits and counted bad-row skips;
* :mod:`.prepare` - LongBlocks parquet -> filtered, tokenized shards (``dgrpo data prepare``);
* :mod:`.synth` - the offline task generator (``dgrpo data synth``);
* :mod:`.answers`, :mod:`.rewards` - answer extraction convention and reward registry;
* :mod:`.mix` - token-share mixing of long and short data, resumable;
* :mod:`.pack` - THD packing with cu_seqlens and prompt/response loss masks;
* :mod:`.evaluate` - RULER-style score tables (Markdown, JSON, heatmap);
* :mod:`.cli` - argument parsing and entry points of the ``dgrpo data`` commands.
"""
