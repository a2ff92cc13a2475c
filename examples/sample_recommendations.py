"""Recommendations from the sample catalog shipped in the package (the README's second
snippet): one "like", then three items with the reason for each."""

import sys
import tempfile
from pathlib import Path

from ondevice import Passphrase, PersonalizationEngine
from ondevice.sample import SAMPLE_BUNDLE, SAMPLE_PUBLIC_KEY, sample_policy

workdir = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
engine = PersonalizationEngine(
    workdir / "profile",
    key=Passphrase("..."),
    policy=sample_policy(),
    privacy_level="individual",
    bundle=SAMPLE_BUNDLE,
    bundle_public_key=SAMPLE_PUBLIC_KEY,
)
engine.update_profile("me", {"item_id": "photos-collage-template", "event": "like"})
for r in engine.get_recommendations("me", {"daypart": "evening"}, k=3):
    print(r.title, "-", r.explanation)
engine.close()
