#!/bin/bash
# Cold restore of an epoch next to a cold sequential read of the files it reads.
B=./consnap-bin; S=$1; AT=$2
id=$($B inspect $S $AT | head -1 | sed 's/epoch \([0-9]*\):.*/\1/')
files=$($B inspect $S $id | grep -E '^ +[0-9]+ +(full|incremental)' | awk '{print $NF}')
sync; echo 3 > /proc/sys/vm/drop_caches
$B restore $S --at $id --pause-probe 0 --report m.json > /dev/null 2>&1 &
pid=$!; sleep 4
# restore_s measures until the VM could run; SIGTERM ends the run and writes the report.
kill -TERM $pid; wait $pid
rs=$(python3 -c "import json;r=json.load(open('m.json'));f=r['restored_from'];print(f['restore_s'], f['chain'], f['bytes_read'], r['checksum'])")
sync; echo 3 > /proc/sys/vm/drop_caches
bytes=$(cat $files | wc -c)
t0=$(date +%s.%N); cat $files > /dev/null; t1=$(date +%s.%N)
echo "$S epoch $id ($AT): restore_s chain bytes_read checksum = $rs; cold cat of its $(echo $files | wc -w) files: $bytes bytes in $(echo "$t1 - $t0" | bc) s"
