#!/usr/bin/env bash
# Seed inputs (fuzz/corpus/ is not committed). `header`: valid shards in its "JSON
# after a correct length prefix" mode, byte 0 = 0, bytes 1-2 = the data section's
# length (little-endian), then the header text. `index`: valid and near-valid indexes
# of its two shards (x, y in a.safetensors; z in b.safetensors).
set -euo pipefail
out="$(dirname "$0")/corpus/header"
mkdir -p "$out"
seed() { # name, data length (< 256), header text
    printf "\\x00\\x$(printf %02x "$2")\\x00%s" "$3" > "$out/seed-$1"
}
seed empty 0 '{}'
seed meta 0 '{"__metadata__":{"format":"pt"}}'
seed one 4 '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
seed two 12 '{"__metadata__":{"format":"pt"},"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"BF16","shape":[2,2],"data_offsets":[4,12]}}'
seed gap 40 '{"w":{"dtype":"I64","shape":[2],"data_offsets":[8,24]},"z":{"dtype":"F16","shape":[0,3],"data_offsets":[30,30]},"f4":{"dtype":"F4","shape":[3,2],"data_offsets":[24,27]}}'
seed fnuz 6 '{"__metadata__":null,"a":{"dtype":"F8_E4M3FNUZ","shape":[3],"data_offsets":[0,3]},"b":{"dtype":"F8_E5M2FNUZ","shape":[3],"data_offsets":[3,6]},"z":{"dtype":"F6_E3M2","shape":[0],"data_offsets":[6,6]}}'
seed trailing 9 '{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}'
seed scalar 8 '{"s":{"dtype":"C64","shape":[],"data_offsets":[0,8]},"t":{"dtype":"BOOL","shape":[0],"data_offsets":[8,8]}}'
# the same shard as a whole file (mode 1): raw length prefix
printf '\x01' > "$out/seed-raw"
text='{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}'
printf "\\x$(printf %02x ${#text})\\x00\\x00\\x00\\x00\\x00\\x00\\x00%s\\x07\\x07" "$text" >> "$out/seed-raw"
index="$(dirname "$0")/corpus/index"
mkdir -p "$index"
printf '%s' '{"metadata":{"total_size":6},"weight_map":{"x":"a.safetensors","y":"a.safetensors","z":"b.safetensors"}}' > "$index/seed-all"
printf '%s' '{"weight_map":{"z":"b.safetensors"}}' > "$index/seed-one-shard"
printf '%s' '{"weight_map":{"x":"b.safetensors","y":"a.safetensors","z":"b.safetensors"}}' > "$index/seed-wrong-shard"
echo "seeds in $out and $index"
