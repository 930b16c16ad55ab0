"""JSON Lines reading shared by `molf train` (data) and `molf plot` (routing logs); `molf train` also takes a
JSON array (`datasets.load_dataset("json")` reads both), CSV and Parquet files."""
import csv
import json
import warnings


def read_jsonl(path, cut_off_tail: bool = False):
    """Yield (line number, object) for every non-empty line (a UTF-8 byte order mark first is skipped);
    ValueError naming the file and line for bad JSON or text that is not UTF-8. cut_off_tail: a last line
    without its newline that does not parse (a writer killed mid-record) is skipped with a warning instead."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if i == 1 else "utf-8")  # a BOM (Windows editors) is no JSON
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{i}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                 "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                if cut_off_tail and not raw.endswith(b"\n"):
                    warnings.warn(f"{path}:{i}: the last line is cut off (its writer stopped mid-record); "
                                  "it is skipped", stacklevel=3)
                    return
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            yield i, rec


def read_records_file(path):
    """Yield (where, object): a CSV file's rows ("path:line", a dict of strings by the header's names), a Parquet
    file's rows ("path[k]", k from 0; needs pyarrow), the elements of a JSON array ("path[k]") when the file's
    text starts with "[", else the objects of its JSON Lines ("path:line"). ValueError naming the file (and
    line) where it is not UTF-8 or not JSON, or a Parquet file pyarrow cannot read."""
    suffix = str(path).lower().rsplit(".", 1)[-1]
    if suffix == "csv":
        yield from _csv_rows(path)
        return
    if suffix == "parquet":
        yield from _parquet_rows(path)
        return
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head.decode("utf-8-sig", errors="replace").lstrip().startswith("["):
        for i, rec in read_jsonl(path):
            yield f"{path}:{i}", rec
        return
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x}); save the file as UTF-8") from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    for k, rec in enumerate(records):
        yield f"{path}[{k}]", rec


def _csv_rows(path):
    limit = csv.field_size_limit(1 << 30)  # a document in one cell may pass the default 128 KB
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            for row in reader:
                yield f"{path}:{reader.line_num}", {k: v for k, v in row.items() if k is not None}
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x}); save the file as UTF-8") from None
    except csv.Error as e:
        raise ValueError(f"{path}: not CSV ({e})") from None
    finally:
        csv.field_size_limit(limit)


def _parquet_rows(path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow), or give JSONL") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow's ArrowInvalid and friends: not a Parquet file, a damaged one
        raise ValueError(f"{path}: not a Parquet file pyarrow can read ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    for k, rec in enumerate(rows):
        yield f"{path}[{k}]", rec
