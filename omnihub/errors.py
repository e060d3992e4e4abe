"""Error pages: JSON under /api/ and /webhook/, Django's HTML pages everywhere else.

Django answers these itself, outside any DRF view: a URL the router's lookup
regex does not match (/api/v1/instances/a%20b/), a body over
DATA_UPLOAD_MAX_MEMORY_SIZE, an uncaught exception. API clients and Evolution
read JSON, and the OpenAPI schema documents only application/json.
"""

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views import defaults

JSON_PREFIXES = ("/api/", "/webhook/")


def wants_json(request: HttpRequest) -> bool:
    return request.path.startswith(JSON_PREFIXES)


def bad_request(request: HttpRequest, exception: Exception) -> HttpResponse:
    if wants_json(request):
        # The exception's text may echo the request (a header, a host): keep it out.
        return JsonResponse({"detail": "Bad request."}, status=400)
    return defaults.bad_request(request, exception)


def not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    if wants_json(request):
        return JsonResponse({"detail": "Not found."}, status=404)
    return defaults.page_not_found(request, exception)


def server_error(request: HttpRequest) -> HttpResponse:
    if wants_json(request):
        return JsonResponse({"detail": "Internal server error."}, status=500)
    return defaults.server_error(request)
