"""JSON Lines reading shared by `molf train` (data) and `molf plot` (routing logs)."""
import json


def read_jsonl(path):
    """Yield (line number, object) for every non-empty line; ValueError naming the line for bad JSON."""
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
