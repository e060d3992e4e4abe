from rest_framework.routers import SimpleRouter

from instances.api_routing import NAME_RE
from webhooks.api import MessageViewSet
from webhooks.api_conversations import ConversationViewSet
from webhooks.api_outbox import OutboundViewSet

# SimpleRouter: instances.urls already serves the API root at /api/v1/.
router = SimpleRouter()
router.register("messages", MessageViewSet, basename="message")
router.register("conversations", ConversationViewSet, basename="conversation")
# The send API: an instance's outbox (instances.urls's instance routes hold no '/').
router.register(
    rf"instances/(?P<instance_name>{NAME_RE})/messages", OutboundViewSet, basename="outbound"
)

urlpatterns = router.urls
