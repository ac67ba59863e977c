# mfg_gen.py's per-device steps (ESP-IDF tools/mass_mfg), shared by `cargo xtask diff-mfg` and
# `cargo xtask bench mfg`, which put their own driver after this prelude.
import csv, os, sys
from itertools import zip_longest
from types import SimpleNamespace
from esp_idf_nvs_partition_gen import nvs_partition_gen as nvs

def lines(path):
    """The file's lines without the blank ones (mfg_gen's `_tmp.csv` copies)."""
    with open(path, 'r', encoding='utf-8') as f:
        return [l for l in f if not l.isspace()]

def read_config(path):
    """The config rows without their REPEAT marks, and the REPEAT keys in order."""
    config = list(csv.reader(lines(path)))
    repeat = [r[0] for r in config if 'REPEAT' in r]
    for r in config:
        if 'REPEAT' in r:
            r.remove('REPEAT')
    return config, repeat

def fill_repeats(header, first, row, repeat):
    """A later row takes the REPEAT keys' values from the first row (`set_repeat_value`)."""
    pending = repeat[:]
    for index, (k, _) in enumerate(zip_longest(header, row)):
        if pending and k == pending[0]:
            row[index] = first[index]
            del pending[0]

def file_id(pairs, fileid, previous):
    """The --fileid column's value, or the next number (`get_fileid_val`)."""
    for pair in pairs:
        if fileid and fileid in pair:
            return pair[1]
    return str(int(previous) + 1)

def write_device_csv(path, config, pairs):
    """The device's `key,type,encoding,value` CSV (`add_data_to_file`); consumes `pairs`."""
    with open(path, 'w', newline='', encoding='utf-8') as out:
        w = csv.writer(out, delimiter=',')
        w.writerow(['key', 'type', 'encoding', 'value'])
        for data in config:
            if 'namespace' in data:
                w.writerow(data + [''])
                continue
            while data[0] not in pairs[0]:
                del pairs[0]
            w.writerow(data + [pairs[0][1]])
            del pairs[0]
