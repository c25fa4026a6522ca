"""The panel's description of a model package (InferenceSpecificSegLib.models.packageDetails), for
packages that `isseg package` writes from other networks: read from model.json only, without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import slicer_test_support  # noqa: F401  (puts the module folder on sys.path)
from isseg import packaging
from test_bundle_package import write_bundle

from InferenceSpecificSegLib.models import (DEMO_MODEL, describePackage, installModelPackage, modelDetailsText,
                                            packageDetails)


def test_a_bundle_package_is_installed_and_described(tmp_path, labelled_atlas):
    source = write_bundle(tmp_path / "bundle")
    package = tmp_path / "package"
    packaging.build_package(packaging.read_network(source), labelled_atlas, package, mapping_spec=None)
    entry = installModelPackage(package, tmp_path / "models")
    assert entry.title.startswith("Phantom abdomen bundle")
    details = packageDetails(entry.location)
    assert details.networkKind == "MONAI bundle" and details.atlasCases == 2
    assert details.labels == ("liver", "spleen", "kidney_left", "kidney_right", "aorta", "gallbladder")
    assert details.license == "Apache License 2.0 (test bundle)" and details.citation == "A test bundle, 2026."
    assert details.atlasSource == str(labelled_atlas.resolve()) and details.unmappedNetworkLabels == ()
    text = details.text()
    assert "Network: MONAI bundle" in text and "Atlas: 2 labelled cases" in text and "Cite: A test bundle" in text
    assert modelDetailsText(entry.location) == text and "phantom" in modelDetailsText(DEMO_MODEL)
    assert "cannot be described" in modelDetailsText(str(tmp_path / "missing"))


def test_details_are_read_without_torch(tmp_path, labelled_atlas):
    source = write_bundle(tmp_path / "bundle")
    packaging.build_package(packaging.read_network(source), labelled_atlas, tmp_path / "package")
    lib = Path(__file__).parents[1] / "InferenceSpecificSeg"
    code = (f"import sys; sys.path.insert(0, {str(lib)!r}); from InferenceSpecificSegLib.models import packageDetails; "
            f"print(packageDetails({str(tmp_path / 'package')!r}).networkKind); print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8")
    assert result.stdout.split() == ["MONAI", "bundle", "False"], result.stderr
    assert describePackage(tmp_path / "package").location == str(tmp_path / "package")
