from rest_framework.routers import DefaultRouter

from instances.api import InstanceViewSet

router = DefaultRouter()
router.register("instances", InstanceViewSet)

urlpatterns = router.urls
