"""Test-session settings that must be in place before any test module imports its libraries."""

import os
import tempfile

# `datasets` caches every local file it reads; keep that out of the user's ~/.cache/huggingface. Set at import
# time: datasets reads the variable once, when it is first imported.
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="passk_rl_test_datasets_"))
