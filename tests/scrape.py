"""Read a gateway's /metrics the way Prometheus does (HTTP, the text format,
prometheus_client's own parser) and look samples up by name and labels."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Samples:
    text: str
    values: dict[str, list[tuple[dict[str, str], float]]]

    def get(self, name: str, **labels: str) -> float:
        """The one sample of `name` with exactly these labels (0 when absent)."""
        for sample_labels, value in self.values.get(name, []):
            if sample_labels == labels:
                return value
        return 0.0

    def total(self, name: str, **labels: str) -> float:
        """The sum of every sample of `name` whose labels include these."""
        return sum(
            value
            for sample_labels, value in self.values.get(name, [])
            if all(sample_labels.get(k) == v for k, v in labels.items())
        )

    def by(self, name: str, label: str, **labels: str) -> dict[str, float]:
        """The samples of `name` summed per value of `label` (zeros left out)."""
        sums: dict[str, float] = defaultdict(float)
        for sample_labels, value in self.values.get(name, []):
            if all(sample_labels.get(k) == v for k, v in labels.items()):
                sums[sample_labels.get(label, "")] += value
        return {key: value for key, value in sums.items() if value}


async def scrape(url: str) -> Samples:
    async with httpx.AsyncClient() as client:
        response = await client.get(url)
    response.raise_for_status()
    assert response.headers["content-type"].startswith("text/plain")
    values: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            values[sample.name].append((dict(sample.labels), sample.value))
    return Samples(response.text, dict(values))
