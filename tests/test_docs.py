"""docs/tour.md walks the code: every file it links exists, every `Class.method` it names is
defined (class and method together) in one of the files it links, and every other name it
quotes is defined somewhere in the package (builtins aside)."""
import builtins
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def defines(source: str, name: str) -> bool:
    """A class, function or method of that name, or a dataclass field."""
    return re.search(rf"^\s*(class|def) {re.escape(name)}\b|^\s+{re.escape(name)}\s*:", source, re.M) is not None


def test_every_link_and_name_in_the_tour_resolves():
    tour = (ROOT / "docs" / "tour.md").read_text()
    links = re.findall(r"\]\(\.\./([^)#]+)\)", tour)
    assert len(links) > 20
    for link in links:
        assert (ROOT / link).exists(), link
    package = "\n".join(p.read_text() for p in (ROOT / "nanovllm").rglob("*.py"))
    linked = [(ROOT / link).read_text() for link in links if link.endswith(".py")]
    checked = 0
    for name in re.findall(r"`([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)?)`", tour):
        if "." in name and name[0].isupper():
            cls, attr = name.split(".")
            assert any(defines(f, cls) and defines(f, attr) for f in linked), f"{name} is in no linked file"
            checked += 1
        elif "." not in name and (name[0].isupper() or "_" in name) and not hasattr(builtins, name):
            assert defines(package, name), f"{name} is defined nowhere in nanovllm/"
            checked += 1
    assert checked > 20
