# The index an openai agent's history is read with (webhooks/agent_history.py),
# of answered rows only, so that storing a delivery does not write to it.

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('webhooks', '0006_conversation_indexes'),
    ]

    operations = [
        migrations.AddIndex(
            model_name='inboundmessage',
            index=models.Index(condition=models.Q(('reply_text__isnull', False)), fields=['instance', 'chat_jid', 'session_name', 'id'], name='webhooks_session_history'),
        ),
    ]
