"""JSON Lines reading shared by `molf train` (data) and `molf plot` (routing logs)."""
import json


def read_jsonl(path):
    """Yield (line number, object) for every non-empty line; ValueError naming the file and line for bad
    JSON or text that is not UTF-8."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{i}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                 "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
