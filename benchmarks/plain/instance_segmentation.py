"""Plain torchvision instance segmentation: the detection tutorial's loop with Mask R-CNN
(benchmarks/plain/detection.py with masks on)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

if __name__ == "__main__":
    i = sys.argv.index("--settings") + 1 if "--settings" in sys.argv else None
    if i is None:
        sys.argv += ["--settings", json.dumps({"masks": True})]
    else:
        sys.argv[i] = json.dumps({**json.loads(sys.argv[i]), "masks": True})
    import detection

    detection.main()
