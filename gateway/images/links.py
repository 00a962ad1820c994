"""A task's image links: where its images are, and pointing them at mjgate (``images.rewrite``).

A task names its image in ``imageUrl``; some upstreams also list several in ``imageUrls``
(strings, or objects with a ``url``). Rewritten, those fields carry mjgate's signed URLs and
the upstream's own links move to ``properties.originalImageUrl`` and
``properties.originalImageUrls``, where the image route still finds them.
"""

from __future__ import annotations

from typing import Any

from gateway.images.signing import UrlSigner
from gateway.tasks import valid_task_id

__all__ = ["LinkRewriter", "original_links", "source_link"]

Link = tuple[int | None, str]  # (index in imageUrls, or None for imageUrl; the URL)


def _url_of(item: Any) -> str | None:
    url = item.get("url") if isinstance(item, dict) else item
    return url if isinstance(url, str) and url else None


def _properties(task: dict[str, Any]) -> dict[str, Any]:
    properties = task.get("properties")
    if not isinstance(properties, dict):
        properties = task["properties"] = {}
    return properties


def original_links(task: dict[str, Any]) -> list[Link]:
    """Every image link the upstream gave the task (its own, also after a rewrite)."""
    properties = task.get("properties")
    kept = properties if isinstance(properties, dict) else {}
    links: list[Link] = []
    main = _url_of(kept.get("originalImageUrl") or task.get("imageUrl"))
    if main is not None:
        links.append((None, main))
    many = kept.get("originalImageUrls") or task.get("imageUrls")
    if isinstance(many, list):
        links += [(n, url) for n, item in enumerate(many) if (url := _url_of(item)) is not None]
    return links


def source_link(task: dict[str, Any], n: int | None) -> str | None:
    """The upstream's link to image ``n`` of the task (None: its ``imageUrl``)."""
    return next((url for index, url in original_links(task) if index == n), None)


class LinkRewriter:
    """Points a task's image links at mjgate's signed URLs, keeping the originals."""

    def __init__(self, signer: UrlSigner) -> None:
        self.signer = signer
        self._ours = f"{signer.public_url}/mj/image/"

    def rewrite(self, task: dict[str, Any], now: float) -> bool:
        """Rewrite in place; True when anything changed (never for links already ours)."""
        task_id = task.get("id")
        if not isinstance(task_id, str) or not valid_task_id(task_id):
            return False
        changed = False
        main = _url_of(task.get("imageUrl"))
        if main is not None and not main.startswith(self._ours):
            _properties(task)["originalImageUrl"] = main
            task["imageUrl"] = self.signer.url(task_id, None, now)
            changed = True
        many = task.get("imageUrls")
        if isinstance(many, list) and any(
            (url := _url_of(item)) is not None and not url.startswith(self._ours) for item in many
        ):
            _properties(task)["originalImageUrls"] = many
            task["imageUrls"] = [
                _replaced(item, self.signer.url(task_id, n, now)) for n, item in enumerate(many)
            ]
            changed = True
        return changed


def _replaced(item: Any, url: str) -> Any:
    if isinstance(item, dict) and _url_of(item) is not None:
        return {**item, "url": url}
    return url if _url_of(item) is not None else item
