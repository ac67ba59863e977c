# Times the reference's generate() or encrypt() in one Python process, as `cargo xtask bench`
# compares them. argv: MODE CSV OUTDIR N [KEYFILE]
#   generate CSV OUTDIR N          writes OUTDIR/ref.bin
#   encrypt  CSV OUTDIR N KEYFILE  writes OUTDIR/ref_enc.bin, encrypted with KEYFILE (--inputkey)
# Prints the mean seconds per image.

import os
import sys
import time
from types import SimpleNamespace

from esp_idf_nvs_partition_gen import nvs_partition_gen as nvs

mode, csv, outdir, n = sys.argv[1], os.path.abspath(sys.argv[2]), sys.argv[3], int(sys.argv[4])


# Both functions rewrite some of their arguments (version, outdir, output): a fresh namespace
# each call.
def generate():
    nvs.generate(SimpleNamespace(input=[csv], output='ref.bin', size='0x6000', version=2, outdir=outdir))


def encrypt():
    nvs.encrypt(SimpleNamespace(
        input=[csv], output='ref_enc.bin', size='0x6000', version=2, outdir=outdir, keygen=False,
        inputkey=key, keyfile=None, key_protect_hmac=False, kp_hmac_keygen=False,
        kp_hmac_keyfile=None, kp_hmac_inputkey=None))


if mode == 'generate':
    once = generate
elif mode == 'encrypt':
    key = os.path.abspath(sys.argv[5])
    once = encrypt
else:
    raise SystemExit('ref_bench.py: unknown mode %r' % mode)

# Its progress messages still get written, to /dev/null, as the CLI writes them to a terminal.
saved_out, saved_err = os.dup(1), os.dup(2)
devnull = os.open(os.devnull, os.O_WRONLY)
os.dup2(devnull, 1)
os.dup2(devnull, 2)
try:
    for _ in range(min(10, n)):
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
