"""SQL identifiers: quoting and derived names that fit PostgreSQL's 63-byte limit."""

import hashlib

MAX_IDENTIFIER_BYTES = 63


def quote_ident(name: str) -> str:
    """Quote an identifier unconditionally, so mixed case and keywords are safe."""
    return '"' + name.replace('"', '""') + '"'


def qualified(schema: str, name: str) -> str:
    return f"{quote_ident(schema)}.{quote_ident(name)}"


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def derived_name(base: str, suffix: str) -> str:
    """Return base + suffix, shortened with a hash of base when it exceeds 63 bytes.

    PostgreSQL silently truncates longer identifiers, which would make two derived
    names collide; the hash keeps them distinct and stable across runs.
    """
    name = base + suffix
    if len(name.encode()) <= MAX_IDENTIFIER_BYTES:
        return name
    digest = hashlib.sha1(base.encode()).hexdigest()[:8]
    budget = MAX_IDENTIFIER_BYTES - len(suffix.encode()) - len(digest) - 1
    head = base.encode()[:budget].decode(errors="ignore")
    return f"{head}_{digest}{suffix}"


def column_list(names: list[str], prefix: str = "") -> str:
    """Render `prefix."a", prefix."b"` (or `"a", "b"` without a prefix)."""
    lead = f"{prefix}." if prefix else ""
    return ", ".join(lead + quote_ident(name) for name in names)
