"""Translation of user-visible text in the GUI-free library.

Inside 3D Slicer the module file has already imported `slicer.i18n` (which needs the application), and
text is translated exactly as Slicer's own `tr` does it: the context is derived from the calling source
file. Outside Slicer (plain Python, the slicer-core wheel in tests) `slicer.i18n` is never loaded and the
text stays in English. The library never imports `slicer.i18n` itself, so it keeps working without Qt.
"""

import sys


def tr(text: str) -> str:
    """Translate `text` in the context of the calling file (Slicer's convention); identity outside Slicer."""
    i18n = sys.modules.get("slicer.i18n")
    if i18n is None:
        return text
    callerFile = sys._getframe(1).f_code.co_filename
    return i18n.translate(i18n.getContext(callerFile), text)
