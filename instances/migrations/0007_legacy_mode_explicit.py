"""Legacy mode becomes an explicit property, and its reply server is pinned.

Until now "legacy" meant "the default instance": moving the default renamed
the agent sessions of both tenants and left the old default without any way
to reply. The instance that is the default now keeps the behaviour it had
(legacy_mode on). A legacy instance without an Evolution URL pins the server
its last replied message went through (Evolution accepted that key there);
with none, the next delivery pins it.
"""

import django.core.validators
import instances.validators
from django.db import migrations, models


def keep_the_default_as_it_was(apps, schema_editor):
    instances = apps.get_model("instances", "InstanceConfig")
    messages = apps.get_model("webhooks", "InboundMessage")
    for instance in instances.objects.filter(is_default=True):
        instance.legacy_mode = True
        if not instance.evolution_url:
            last = (
                messages.objects.filter(instance=instance, status="replied")
                .exclude(reply_server_url="")
                .order_by("-id")
                .values_list("reply_server_url", flat=True)
                .first()
            )
            instance.legacy_server_url = last or ""
        instance.save(update_fields=["legacy_mode", "legacy_server_url"])


class Migration(migrations.Migration):

    dependencies = [
        ('instances', '0006_secrets_encrypted_at_rest'),
        ('webhooks', '0004_permissions'),
    ]

    operations = [
        migrations.AddField(
            model_name='instanceconfig',
            name='legacy_mode',
            field=models.BooleanField(default=False, help_text="Behave as the single-tenant service this hub replaced: agent sessions named SESSION_ID_PREFIX + number (without the instance's name) and, with no Evolution URL and key, replies through the server deliveries name (pinned below). Set on the instance seeded from .env; moving the default does not change it."),
        ),
        migrations.AddField(
            model_name='instanceconfig',
            name='legacy_server_url',
            field=models.CharField(blank=True, help_text="Legacy mode without an Evolution URL: the server_url of the first delivery, pinned so that no one else can choose where replies go. Deliveries naming another server are stored as ignored. Clear it to pin the next one's.", max_length=500, validators=[instances.validators.validate_http_url, django.core.validators.ProhibitNullCharactersValidator()], verbose_name='Legacy reply server'),
        ),
        migrations.AlterField(
            model_name='instanceconfig',
            name='evolution_url',
            field=models.CharField(blank=True, help_text='e.g. https://evolution.example.com. Blank only in legacy mode (replies through the legacy reply server).', max_length=500, validators=[instances.validators.validate_http_url, django.core.validators.ProhibitNullCharactersValidator()], verbose_name='Evolution API URL'),
        ),
        migrations.AlterField(
            model_name='instanceconfig',
            name='session_id_prefix',
            field=models.CharField(blank=True, help_text="Prepended to the phone digits to form the agent session name. Blank: '<name>_', so two tenants never share a session (in legacy mode: nothing, as the single-tenant service named them).", max_length=64, validators=[django.core.validators.ProhibitNullCharactersValidator()]),
        ),
        migrations.AlterField(
            model_name='instanceconfig',
            name='whatsapp_instance',
            field=models.CharField(blank=True, help_text="The instance's name inside Evolution. Blank: the same as the name (in legacy mode without an Evolution URL: the delivery's instance).", max_length=128, validators=[django.core.validators.ProhibitNullCharactersValidator()], verbose_name='WhatsApp instance'),
        ),
        migrations.RunPython(keep_the_default_as_it_was, migrations.RunPython.noop),
    ]
