"""Extension Index readiness: InferenceSpecificSeg.json follows the catalog entry schema (Slicer/Slicer
Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json, what the ExtensionsIndex entries reference), and the
top-level CMakeLists.txt metadata that the index's scripts/check_description_files.py reads (project name, icon
and screenshot URLs, matched with its regular expressions) names files that exist in this repository."""

import json
import re
import struct
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENTRY = ROOT / "InferenceSpecificSeg.json"
SCHEMA_URL = "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json#"
# The schema's properties with their JSON types (it allows no other key) and its required keys.
SCHEMA_PROPERTIES = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
                     "build_dependencies": list, "build_subdirectory": str, "enabled": bool, "tier": int}
SCHEMA_REQUIRED = ("$schema", "category", "scm_url")


def cmake() -> str:
    return (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")


def cmakeValue(variable: str) -> str:
    match = re.search(r'set\s*\(' + variable + r'\s*"([^"]+)"[ ]*\)', cmake(), re.IGNORECASE)
    assert match, f"no {variable} in CMakeLists.txt"
    return match.group(1)


def pngSize(path: Path) -> tuple:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


def repositoryFile(url: str, entry: dict) -> Path:
    """The file of this repository that a raw.githubusercontent.com URL of the entry's repository and revision names."""
    owner_repo = entry["scm_url"].removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{owner_repo}/{entry['scm_revision']}/"
    assert url.startswith(prefix), f"{url} is not a file of {entry['scm_url']} at {entry['scm_revision']}"
    path = ROOT / url.removeprefix(prefix)
    assert path.is_file(), f"{url}: {path} does not exist"
    if (ROOT / ".git").exists():
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", str(path)], cwd=ROOT, capture_output=True)
        assert tracked.returncode == 0, f"{path} is not committed"
    return path


def test_index_entry_follows_the_catalog_schema_and_matches_the_cmake_metadata():
    entry = json.loads(ENTRY.read_text(encoding="utf-8"))
    assert set(SCHEMA_REQUIRED) <= set(entry) and set(entry) <= set(SCHEMA_PROPERTIES)
    assert all(isinstance(entry[key], SCHEMA_PROPERTIES[key]) for key in entry)
    assert entry["$schema"] == SCHEMA_URL
    assert entry["scm_url"].startswith("https://github.com/") and entry["scm_revision"] == "main"
    assert 1 <= entry["tier"] <= 5 and entry["build_subdirectory"] == "."
    # The index names the extension by the file; check_cmakelists_content compares it with project().
    assert re.findall(r'project\s*\(\s*([^\s\)\n\r]+)', cmake(), re.IGNORECASE)[0] == ENTRY.stem
    assert entry["category"] == cmakeValue("EXTENSION_CATEGORY")
    assert entry["build_dependencies"] == cmakeValue("EXTENSION_DEPENDS").split()
    assert cmakeValue("EXTENSION_HOMEPAGE").startswith(entry["scm_url"] + "/")
    assert (ROOT / "LICENSE").is_file()


def test_icon_and_screenshot_urls_name_committed_pngs():
    entry = json.loads(ENTRY.read_text(encoding="utf-8"))
    icon = repositoryFile(cmakeValue("EXTENSION_ICONURL"), entry)
    assert icon.parent == ROOT / "Resources" / "Icons" and pngSize(icon) == (128, 128)
    screenshots = re.findall(r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)', cmake(), re.IGNORECASE)[0].split()
    assert screenshots
    for url in screenshots:
        path = repositoryFile(url, entry)
        assert path.parent == ROOT / "Resources" / "Screenshots"
        width, height = pngSize(path)
        assert width >= 800 and height >= 400
