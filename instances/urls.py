from rest_framework.routers import DefaultRouter

from instances.api import InstanceViewSet
from instances.api_routing import NAME_RE, AgentViewSet, RouteViewSet
from instances.api_send_keys import SendKeyViewSet

router = DefaultRouter()
router.register("instances", InstanceViewSet)
# Before the instances' own routes would not matter: their detail regex has no '/'.
router.register(rf"instances/(?P<instance_name>{NAME_RE})/agents", AgentViewSet)
router.register(rf"instances/(?P<instance_name>{NAME_RE})/routes", RouteViewSet)
router.register(rf"instances/(?P<instance_name>{NAME_RE})/send-keys", SendKeyViewSet)

urlpatterns = router.urls
