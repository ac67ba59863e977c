# Runs many reference-generator jobs in one Python process (the interpreter start costs ~90 ms,
# far more than a job). Written out and run by `cargo xtask diff-ref`.
#
# argv: JOBS.tsv RESULTS.tsv. Each job line is tab-separated: KIND DIR ARGS...
#   gen  DIR VERSION SIZE OUTPUT INPUT...
#   enc  DIR VERSION SIZE OUTPUT KEYFILE INPUT...
#   dec  DIR INPUT KEYFILE OUTPUT        (skipped when INPUT is missing or empty)
#   hkey DIR HMACKEY KEYFILE             (writes DIR/keys/KEYFILE)
# Each result line is `INDEX<TAB>CODE`: the exit code the CLI would have had (0, 1, 254...), or
# `skip`. Everything a job prints goes to DIR/ref.log.

import os
import sys
import traceback
from types import SimpleNamespace

from esp_idf_nvs_partition_gen import nvs_partition_gen as nvs


def exit_code(fn, args):
    try:
        fn(args)
        return 0
    except SystemExit as e:
        # log.die(..., exit_code=-2) is exit status 254, as the CLI process reports it.
        if e.code is None:
            return 0
        return e.code & 0xFF if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
        return 1


def run_job(kind, cwd, f):
    if kind == 'gen':
        version, size, output, inputs = f[0], f[1], f[2], f[3:]
        return exit_code(nvs.generate, SimpleNamespace(
            input=inputs, output=output, size=size, version=int(version), outdir=cwd))
    if kind == 'enc':
        version, size, output, key, inputs = f[0], f[1], f[2], f[3], f[4:]
        return exit_code(nvs.encrypt, SimpleNamespace(
            input=inputs, output=output, size=size, version=int(version), keygen=False,
            inputkey=key, keyfile=None, key_protect_hmac=False, kp_hmac_keygen=False,
            kp_hmac_keyfile=None, kp_hmac_inputkey=None, outdir=cwd))
    if kind == 'dec':
        src, key, output = f
        if not os.path.isfile(src) or os.path.getsize(src) == 0:
            return 'skip'
        return exit_code(nvs.decrypt, SimpleNamespace(input=src, key=key, output=output, outdir=cwd))
    if kind == 'hkey':
        hmac_key, keyfile = f
        return exit_code(nvs.generate_key, SimpleNamespace(
            keyfile=keyfile, key_protect_hmac=True, kp_hmac_keygen=False, kp_hmac_keyfile=None,
            kp_hmac_inputkey=hmac_key, outdir=cwd))
    raise ValueError('unknown job kind %r' % kind)


def main():
    jobs_path, results_path = (os.path.abspath(p) for p in sys.argv[1:3])
    saved_out, saved_err = os.dup(1), os.dup(2)
    with open(jobs_path, encoding='utf8') as jobs, open(results_path, 'w') as results:
        for index, line in enumerate(jobs):
            kind, case_dir, *fields = line.rstrip('\n').split('\t')
            os.chdir(case_dir)
            log = os.open('ref.log', os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.close(log)
            try:
                print('$ %s %s' % (kind, ' '.join(fields)), flush=True)
                code = run_job(kind, os.getcwd(), fields)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved_out, 1)
                os.dup2(saved_err, 2)
            results.write('%d\t%s\n' % (index, code))
            results.flush()


if __name__ == '__main__':
    main()
