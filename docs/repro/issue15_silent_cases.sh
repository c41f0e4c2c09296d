#!/bin/bash
# Reproduce the silent cases of issue 15 against the code tree $1 (e.g. a `git archive` of an older commit, or
# this checkout). Needs this checkout's .venv and its demo corpus (`make demo`, or `acodm data demo` + `prepare`).
# Usage: docs/repro/issue15_silent_cases.sh CODE_DIR   (prints each case, its exit code and the error line)
REPO=$(cd "$(dirname "$0")/../.." && pwd); CODE=$(cd "$1" && pwd); W=/tmp/acodm_issue15_$(basename $CODE); rm -rf $W; mkdir -p $W; cd $CODE
PY=$REPO/.venv/bin/python; A="$PY -m ray_jobs -q"
cp -r $REPO/data/demo/prepared $W/prep0
$PY - "$W" "$REPO" <<'PY'
import sys, yaml
w, repo = sys.argv[1], sys.argv[2]
c = yaml.safe_load(open(repo + "/configs/demo.yaml"))
for d in c["data"]["domains"]: d["source"]["paths"] = [repo + "/" + p for p in d["source"]["paths"]]
c.update(output_dir=w + "/runs"); c["data"]["prepared_dir"] = w + "/prep"
c["ray"] = {"enabled": False}; c["tracking"] = {"enabled": False}
c["train"] = {"total_steps": 2, "log_interval": 1}; c["eval"] = {"interval": 2, "max_batches": 1, "batch_size": 2}
c["checkpoint"] = {"interval": 2, "keep_last": 1}; c["lm"]["num_layers"] = 1; c["agent"] = {"kind": "uniform"}
c["sampler"]["grad_accum"] = 6
yaml.safe_dump(c, open(w + "/exp.yaml", "w"))
PY
fresh() { rm -rf $W/prep $W/runs; cp -r $W/prep0 $W/prep; }
run() { echo "== $1"; shift; "$@" > $W/out.txt 2>&1; echo "rc=$?"; grep -E "acodm: error|Error|error:" $W/out.txt | head -2 | cut -c1-260; }
fresh; $PY -c "p='$W/prep/code/train_00000.bin';b=bytearray(open(p,'rb').read());b[99]^=1;open(p,'wb').write(b)"
run "1 shard bytes changed, same size" $A train $W/exp.yaml
fresh; $PY -c "
import json;p='$W/prep/manifest.json';m=json.load(open(p));m['domains'][0]['splits']['train']['shards'][0]['sha256']='0'*64;json.dump(m,open(p,'w'))"
run "2 manifest sha256 edited" $A train $W/exp.yaml
fresh; $PY -c "
import json;p='$W/prep/manifest.json';m=json.load(open(p));m['domains'][0]['splits']['train']['num_tokens']+=5;json.dump(m,open(p,'w'))"
run "3 manifest split token count edited" $A train $W/exp.yaml
fresh; $PY -c "
import json;p='$W/prep/tokenizer.json';t=json.load(open(p));t['model']['vocab']['zzzz']=99999;json.dump(t,open(p,'w'))"
run "4 tokenizer.json no longer matches the manifest hash" $A train $W/exp.yaml
fresh; $PY -c "p='$W/prep/manifest.json';b=open(p,'rb').read();open(p,'wb').write(b[:len(b)//2])"
run "5 truncated manifest.json" $A train $W/exp.yaml
fresh; run "6 data.tokenizer.vocab_size disagrees with the corpus" $A train $W/exp.yaml --set data.tokenizer.vocab_size=4096
grep -A0 "vocab_size" $W/runs/demo/config.yaml 2>/dev/null | head -1
fresh; run "7 prepare with other domains into the prepared dir (runs used it)" $A data prepare $W/exp.yaml --set "data.domains=[{name: code, source: {paths: [$REPO/data/demo/raw/code.jsonl]}}, {name: junk, target: false, source: {paths: [$REPO/data/demo/raw/junk.jsonl]}}]"
fresh; $PY -c "
import yaml;c=yaml.safe_load(open('$W/exp.yaml'));c['train']['total_steps']=300;c['checkpoint']['interval']=1;yaml.safe_dump(c,open('$W/long.yaml','w'))"
$A train $W/long.yaml > $W/first.txt 2>&1 & FIRST=$!; sleep 25
run "8 a second train on the same run directory while the first runs" $A train $W/long.yaml --set checkpoint.keep_last=1
kill -9 $FIRST 2>/dev/null; wait $FIRST 2>/dev/null
fresh; run "9 name=../../escape" $A train $W/exp.yaml --set name=../../escape; ls -d $W/escape 2>/dev/null && echo "   wrote outside output_dir: $W/escape"
run "10 config path is a directory" $A train $W
run "11 source path is a directory" $A data prepare $W/exp.yaml --set "data.prepared_dir=$W/p11" --set 'data.domains=[{name: a, source: {paths: [/tmp]}}, {name: b, source: {paths: [/tmp]}}]'
echo x > $W/afile; run "12 data demo onto an existing file" $A data demo $W/afile
fresh; $A train $W/exp.yaml > /dev/null 2>&1  # a finished run to report on
run "13 report --out onto an existing file" $A report $W/runs/demo --out $W/afile
