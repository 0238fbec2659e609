"""Column names of the public LongBlocks parquet files and of the synthetic data written here.

Public columns (all strings): id, document, source, language, question, answer, and one teacher
response per teacher model. Synthetic files add task metadata columns after these (see
:data:`SYNTH_METADATA_SCHEMA`); the teacher columns are null there. The RULER suite
(:mod:`.ruler`) adds ``references`` (every reference answer; ``answer`` lists them one per line)
and ``max_new_tokens`` (RULER's generation budget for the task) in :data:`RULER_SCHEMA`.
"""

from __future__ import annotations

import pyarrow as pa

REQUIRED_COLUMNS = ("id", "document", "source", "language", "question", "answer")
RESPONSE_PREFIX = "response_"  # a column of one model's responses (teacher outputs)
TEACHER_COLUMNS = (
    "response_Qwen3-Next-80B-A3B",
    "response_Qwen3.5-27B",
    "response_Nemotron-3-Nano-30B-A3B",
)
PUBLIC_COLUMNS = REQUIRED_COLUMNS + TEACHER_COLUMNS
# The source whose public rows ship with document = null (rebuilt by `dgrpo data rebuild-documents`).
INSTITUTIONAL_BOOKS = "Institutional-Books-1.0"
PUBLIC_SCHEMA = pa.schema([(name, pa.string()) for name in PUBLIC_COLUMNS])
SYNTH_METADATA_SCHEMA = pa.schema(
    [
        ("task_family", pa.string()),
        ("task", pa.string()),
        ("question_template", pa.string()),
        ("hops", pa.int32()),
        ("length_bucket", pa.string()),
        ("target_tokens", pa.int32()),
        ("num_tokens", pa.int32()),
        ("needle_depth", pa.float64()),
        ("needle_depth_target", pa.float64()),
        ("needle_depths", pa.list_(pa.float64())),
        ("needle_section", pa.int32()),
        ("token_counter", pa.string()),
    ]
)
SYNTH_SCHEMA = pa.schema(list(PUBLIC_SCHEMA) + list(SYNTH_METADATA_SCHEMA))
RULER_SCHEMA = pa.schema(
    list(SYNTH_SCHEMA) + [("references", pa.list_(pa.string())), ("max_new_tokens", pa.int32())]
)
