"""The command of results/deit_s_cait_speed_b{32,1}.md, kept so it still runs: now benchmarks/speed.py --exported.

    python benchmarks/cait_speed.py --batch-size 32 --runs 12 --threads 2 --name deit_s_cait_speed_b32

ATME patched, CDCP and CAIT exported (vitslim.export.slim) at 0.5 and 0.7 MACs on DeiT-S; any
speed.py option may follow. New tables: bash benchmarks/speed.sh cait.
"""
import sys

import speed  # benchmarks/speed.py, beside this file

if __name__ == "__main__":
    sys.exit(speed.main(["--exported", "--methods", "atme,cdcp,cait", "--budgets", "0.5,0.7", *sys.argv[1:]]))
