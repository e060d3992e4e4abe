from rest_framework.routers import SimpleRouter

from webhooks.api import MessageViewSet
from webhooks.api_conversations import ConversationViewSet

# SimpleRouter: instances.urls already serves the API root at /api/v1/.
router = SimpleRouter()
router.register("messages", MessageViewSet, basename="message")
router.register("conversations", ConversationViewSet, basename="conversation")

urlpatterns = router.urls
