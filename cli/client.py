"""A small HTTP client for the tmc API (used by the CLI)."""

from __future__ import annotations

import os
from typing import Any

import httpx


class ClientError(Exception):
    """The server refused the request (4xx) or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class TmcClient:
    def __init__(self, server: str, admin_token: str | None = None,
                 inference_token: str | None = None, timeout: float = 60.0) -> None:
        try:
            self.http = httpx.Client(base_url=server.rstrip("/"), timeout=timeout)
        except (httpx.InvalidURL, TypeError, ValueError) as exc:
            raise ClientError(f"invalid server URL {server!r}: {exc}") from exc
        self.admin_token = admin_token or os.environ.get("TMC_ADMIN_TOKEN")
        self.inference_token = inference_token or os.environ.get("TMC_INFERENCE_TOKEN")

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, *, admin: bool = False, **kwargs: Any) -> Any:
        token = self.admin_token if admin else self.inference_token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            response = self.http.request(method, path, headers=headers, **kwargs)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise ClientError(f"cannot reach {self.http.base_url}: {exc}") from exc
        body = _json(response)
        if response.status_code >= 400:
            message = ((body.get("error") or body.get("detail")) if isinstance(body, dict)
                       else None) or response.text[:500] or response.reason_phrase
            raise ClientError(f"{response.status_code}: {message}", response.status_code)
        return body

    def base(self) -> Any:
        return self.request("GET", "/v1/base")

    def push(self, cid: str, data: bytes, weight: float, tags: list[str], active: bool) -> Any:
        params: dict[str, Any] = {"weight": weight, "active": active, "tag": tags}
        return self.request("PUT", f"/v1/components/{cid}", admin=True, content=data,
                            params=params)

    def list(self, tag: str | None = None) -> Any:
        return self.request("GET", "/v1/components", admin=True,
                            params={"tag": tag} if tag else None)

    def patch(self, cid: str, **fields: Any) -> Any:
        return self.request("PATCH", f"/v1/components/{cid}", admin=True, json=fields)

    def forget(self, cid: str) -> Any:
        return self.request("DELETE", f"/v1/components/{cid}", admin=True)

    def put_composition(self, name: str, weights: dict[str, float], normalize: str) -> Any:
        return self.request("PUT", f"/v1/compositions/{name}", admin=True,
                            json={"weights": weights, "normalize": normalize})

    def predict(self, body: dict[str, Any]) -> Any:
        return self.request("POST", "/v1/predict", json=body)


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return {"error": response.text[:500]}
