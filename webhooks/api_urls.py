from rest_framework.routers import SimpleRouter

from webhooks.api import MessageViewSet

# SimpleRouter: instances.urls already serves the API root at /api/v1/.
router = SimpleRouter()
router.register("messages", MessageViewSet, basename="message")

urlpatterns = router.urls
