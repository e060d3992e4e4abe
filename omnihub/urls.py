from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

admin.site.site_header = "omnihub"
admin.site.site_title = "omnihub admin"
admin.site.index_title = "Tenants, messages and users"
admin.site.site_url = None  # There is no public site to "view".

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", include("instances.urls")),
    path("api/v1/", include("webhooks.api_urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="swagger-ui"),
    path("", include("webhooks.urls")),
]

handler400 = "omnihub.errors.bad_request"
handler404 = "omnihub.errors.not_found"
handler500 = "omnihub.errors.server_error"
