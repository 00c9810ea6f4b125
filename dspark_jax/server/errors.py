"""OpenAI-shaped errors: every failure answers `{"error": {"message", "type", "param", "code"}}` with the
matching HTTP status (400 invalid request, 401 authentication, 403 permission, 404 not found, 405 method not
allowed — an invalid request too —, 429 quota, 500 server error, 503 unavailable)."""
from __future__ import annotations

from fastapi.responses import JSONResponse

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
               503: "service_unavailable"}


class ApiError(Exception):
    """An error answered to the client. param: the request field at fault; retry_after_s: for 429/503."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after_s = retry_after_s

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {}
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, int(round(self.retry_after_s))))
        if self.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse(self.body(), status_code=self.status, headers=headers)
