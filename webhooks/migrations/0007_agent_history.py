# The index an openai agent's history is read with (webhooks/agents/history.py).
# Named 0007 and depending on 0005 only: another branch adds webhooks 0006.

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('webhooks', '0006_conversation_indexes'),
    ]

    operations = [
        migrations.AddIndex(
            model_name='inboundmessage',
            index=models.Index(fields=['instance', 'chat_jid', 'session_name', 'id'], name='webhooks_session_history'),
        ),
    ]
