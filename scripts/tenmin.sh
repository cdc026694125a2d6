#!/bin/bash
# The 10-minute runs of docs/DESIGN.md ("Done when"): memstress at a 20 ms
# interval, default policy (A) and without reclamation (B).
set -x
B=./consnap-bin
SPEC=memstress,wss=256M,ops=780000,rate=1250,pattern=random
rm -rf A B
$B run --workload $SPEC --mem 1G --snapshot-dir A --interval 20ms --pause-probe 0 --report A.json > A.out 2> A.err
ls A/epochs | wc -l > A.files; du -sb A > A.du
$B run --workload $SPEC --mem 1G --snapshot-dir B --interval 20ms --pause-probe 0 --retain all --max-chain 0 --report B.json > B.out 2> B.err
ls B/epochs | wc -l > B.files; du -sb B > B.du
echo done > done
