# Times the reference's generate() in one Python process, as `cargo xtask bench` compares it:
# argv: CSV OUTDIR N. Prints the mean seconds per image.

import os
import sys
import time
from types import SimpleNamespace

from esp_idf_nvs_partition_gen import nvs_partition_gen as nvs

csv, outdir, n = os.path.abspath(sys.argv[1]), sys.argv[2], int(sys.argv[3])


def once():
    nvs.generate(SimpleNamespace(input=[csv], output='ref.bin', size='0x6000', version=2, outdir=outdir))


# Its progress messages still get written, to /dev/null, as the CLI writes them to a terminal.
saved_out, saved_err = os.dup(1), os.dup(2)
devnull = os.open(os.devnull, os.O_WRONLY)
os.dup2(devnull, 1)
os.dup2(devnull, 2)
try:
    for _ in range(10):
        once()
    start = time.perf_counter()
    for _ in range(n):
        once()
    elapsed = time.perf_counter() - start
finally:
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(saved_out, 1)
    os.dup2(saved_err, 2)
print(elapsed / n)
